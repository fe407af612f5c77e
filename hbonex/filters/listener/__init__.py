"""Built-in listener filters."""
