"""`retrieve serve`: the HTTP front end (FastAPI). Importing this package imports no web framework;
`retrieval.server.app` does."""
