"""Configuration: the typed nodes (defaults and ranges), trust checks for files, resolvers, paths."""
