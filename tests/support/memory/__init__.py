"""In-memory repositories: the storage protocols without DynamoDB, for fast tests."""
