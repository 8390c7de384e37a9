"""tff_dpmed: differentially private federated learning for medical images on TFF.

Layers, each a subpackage, each depending only on the ones before it:
data -> models -> privacy -> federated -> program -> CLIs (train, privacy, export, serve, predict).
"""

__version__ = "0.1.0"
