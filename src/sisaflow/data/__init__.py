"""The training data: importing a corpus into records with content hashes (`corpus`), and placing them into
shards and slices, with the placement that says where each record went (`sharding`). Imports: `core`."""
