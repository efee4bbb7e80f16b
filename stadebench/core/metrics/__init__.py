"""Built-in metrics, registered through the same hook as third-party plugins."""
