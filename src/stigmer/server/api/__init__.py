"""The Stigmer server's HTTP API (Starlette on uvicorn), bound to 127.0.0.1:server.port."""
