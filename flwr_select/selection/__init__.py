"""Training sample selection (Jiang et al. 2017): the site's and the server's engine.

A site trial-tests the received model on its samples (:mod:`.trial`), scores
them (:mod:`.scores`), picks the best under a budget (:mod:`.policies`), keeps a
ledger of what it sent (:mod:`.ledger`) and packs the raw samples into an upload
(:mod:`.wire`). The server checks every upload, keeps the accepted samples in a
training buffer (:mod:`.buffer`), trains on it and checkpoints it
(:mod:`.checkpoint`). :mod:`.protocol` holds what both sides agree on.
Nothing here imports :mod:`flwr_select.parallel`.
"""
