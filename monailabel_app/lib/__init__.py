"""The HyperSpace MONAI Label app's pieces: one config per bundle, its infer task and its train task."""
