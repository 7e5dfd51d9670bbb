# placeholder: the e1000 data path
