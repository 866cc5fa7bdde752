"""Vision transformers through the same interface: MLP hidden neurons of each encoder layer are the units."""
