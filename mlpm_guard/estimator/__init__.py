"""The MLPM estimator: prototypes (scikit-learn shaped), their strict file format, what they read of
the backbone, the shipped defaults, versioned stores, and the SIREN neuron probe beside them."""
