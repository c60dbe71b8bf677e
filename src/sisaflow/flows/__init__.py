"""Prefect flows of sisaflow: when the library's steps run, and with what retries. No ML logic here."""
