"""The compressed corpus in PostgreSQL + pgvector: embedded server, migrations, index builds, search."""
