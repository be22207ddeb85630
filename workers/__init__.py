"""What runs inside a Ray Tune worker: datasets, dual encoders and the trial trainable.

Importing the package loads nothing heavy; import `workers.trainable`, `workers.data` or
`workers.models` for their contents.
"""
