"""16550A UART driver (see docs/serial.md)."""
