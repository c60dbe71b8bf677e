"""The foundation every other package stands on: the workspace's settings (`config`, `config_parse`), its paths
(`paths`), the error types (`errors`), atomic files and content hashes (`fsio`), DVC and git through public
functions (`versioning`, with `dvc_rwlock`'s repair after a killed dvc), the deletion ledger (`ledger`), the
one-run-at-a-time lock (`lock`), the progress of long work (`progress`: counters, and bars in a terminal) and the
test-only kill points of the crash tests (`faults`).

The ledger is here, not in `deletion`, because every layer must obey it: the import leaves its records out, the
ensemble refuses constituents trained on excluded records, and deletion writes it. Imports: the standard library
and third-party packages only; nothing else of sisaflow."""
