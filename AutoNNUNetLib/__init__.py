"""AutoNNUNetLib: find the best nnU-Net for your own labeled volumes.

The library behind the AutoNNUNet 3D Slicer extension, its ``autonnunet`` command and its remote
runner. It never imports slicer, qt, vtk or ctk, so everything here runs headless and is tested
without Slicer.

Modules, one per concept:

- ``dataset``: labeled cases (files, MSD/nnU-Net folders, arrays) -> validated nnU-Net raw dataset
- ``fingerprint``: nnU-Net fingerprint, plans and preprocessing, with a readable summary
- ``config``: the trial configuration record (every searched hyperparameter)
- ``network``: configuration -> the plans' architecture entry (dynamic_network_architectures)
- ``trainer``: a configurable nnU-Net trainer with epoch budgets, resume and fast validation
- ``model``: model folders in nnU-Net's results layout, export/import as zip
- ``inference``: a predictor that loads a model once and segments many volumes
- ``space`` / ``search``: NePS search spaces and the (regularized) PriorBand search
- ``jobs`` / ``server`` / ``client``: the remote runner
- ``cli``: the ``autonnunet`` command
"""

__version__ = "0.1.0"
