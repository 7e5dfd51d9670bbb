# placeholder: the net front end data path
