"""Import vittt before anything else: it makes the CUDA build of torchvision importable next to CPU torch,
which timm needs (see vittt.compat)."""
import vittt  # noqa: F401
