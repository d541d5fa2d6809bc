"""Pure OAuth2 and directory rules: no I/O, so they are cheap to test exhaustively."""
