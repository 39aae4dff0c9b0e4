"""In-memory implementations of the storage repositories, for tests (same contracts)."""
