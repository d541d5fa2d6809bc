"""Pure gateway logic: the route table and header rules, no I/O."""
