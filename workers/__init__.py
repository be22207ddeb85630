"""Code that runs inside a Ray Tune worker: datasets, dual encoders and the trainable.

Importing the package loads nothing heavy. Import `workers.trainable`, `workers.data` or
`workers.models` for their contents.
"""
