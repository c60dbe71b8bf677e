"""A search tool for copies of given records: it is told what to look for (`targets`: texts, their pieces and
encodings, and weights files by hash) and where, and reports what it found. `patterns` is the multi-pattern
index, `formats` opens Parquet, compressed and encoded blobs, `places` walks a workspace, the DVC cache and
remote (a directory or an object store) and the Prefect places `prefect_home` finds, `history` reads git
history, and `progress` counts the bytes searched (a bar in a terminal). It knows nothing of requests, runs or
proofs. Imports: `core`, `data`."""
