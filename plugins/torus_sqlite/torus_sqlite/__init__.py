"""torus metadata backend on SQLite (SQLAlchemy 2, WAL): the embedded default"""
