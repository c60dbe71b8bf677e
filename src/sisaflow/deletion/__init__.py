"""A deletion request's life and its proof: recording and resolving a request and following its state
(`requests`), the impact record taken before a run changes anything (`impact`), removing every old copy
(`purge`), the scan for a request's records and retired weights (`leftovers`, over `scan`), and the signed
certificate (`certificate`, checked by `certificate_schema` against certificate.schema.json, signed with the
keys of `signing`, shown by `certificate_html`).
Imports: `core`, `data`, `models`, `training`, `inference`, `scan`."""
