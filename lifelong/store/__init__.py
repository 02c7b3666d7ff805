"""The store: everything an edit needs to be repeatable and reversible, on disk.

Imports nothing above it (no torch, no model): `layout` owns every on-disk name, `objects`
the immutable array files, `atomic` the write-then-rename steps, `store` the manifest,
transactions and writer lock, `migrations` the format upgrades (torch only inside the
format-1 step, imported when it runs), `history` the pure logic of batch records.
Commands that only read history (log, show, status) start fast because of this, and this
file imports nothing, so `history` alone needs neither numpy nor h5py.
"""
