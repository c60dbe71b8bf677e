"""A search tool for copies of given records: it is told what to look for (`targets`: texts, their pieces and
encodings, and weights files by hash) and where, and reports what it found. `patterns` is the multi-pattern
index, `formats` opens Parquet, compressed and encoded blobs, `places` walks a workspace, the DVC cache and
remote, and git history. It knows nothing of requests, runs or proofs. Imports: `core`, `data`."""
