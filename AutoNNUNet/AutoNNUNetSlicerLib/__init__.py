"""The AutoNNUNet module's own code, beside its view (AutoNNUNet.py), in the SlicerNNUnet shape.

- :mod:`.parameters`: the one search request the UI builds (``search.settings.SearchSettings``).
- :mod:`.install`: dependency pins (read from the library's pyproject.toml) and their install.
- :mod:`.logic`: scene nodes <-> library records (volumes, label maps, segmentations).
- :mod:`.export`: the scene's cases written to a dataset case by case (memory of one case).
- :mod:`.jobs`: the module's running jobs, each with the context it needs when it ends.
- :mod:`.session`: the module's actions (the Logic class is this plus the parameter node).
- :mod:`.chart`: the live Dice / training-time chart.  :mod:`.colors`: segment colors.
- :mod:`.tasks`: short calls off the UI thread (Test connection).
- :mod:`.widget`: what the panel's tables and labels show (text only, no widgets).

Every submodule imports without Slicer: ``slicer``, ``qt`` and ``vtk`` are imported inside the
functions that need them, so pytest reaches everything else (Testing/slicer/).
"""
