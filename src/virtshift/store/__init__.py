"""Revisioned, watchable object stores: the Store protocol, SQLite (default) and etcd."""
