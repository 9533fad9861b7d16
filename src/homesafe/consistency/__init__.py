"""How an app is held still while it is captured or restored."""
