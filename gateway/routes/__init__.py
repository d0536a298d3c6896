"""Thin Litestar route handlers over the gateway's core classes."""
