"""mptrec: multi-task ranking with MPT-Rec prompt tuning on sharded TorchRec embeddings.

The sub-packages live in the repository's top-level folders and are installed under this
namespace: ``mptrec.models``, ``mptrec.pipeline``, ``mptrec.data_loaders``, ``mptrec.launch``,
``mptrec.bench``.
"""

__version__ = "0.1.0"
