"""In-memory repositories: the storage contracts kept in dictionaries, for fast tests."""
