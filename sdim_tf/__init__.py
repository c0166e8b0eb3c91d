"""sdim_tf: Supervised Deep InfoMax in TensorFlow/Keras."""

from sdim_tf import losses, mutual_info
from sdim_tf.class_conditional import ClassConditionalGaussians
from sdim_tf.encoder import ResNetEncoder
from sdim_tf.model import SDIM, DiscriminativeClassifier

__all__ = ["SDIM", "DiscriminativeClassifier", "ResNetEncoder", "ClassConditionalGaussians",
           "losses", "mutual_info"]
__version__ = "0.1.0"
