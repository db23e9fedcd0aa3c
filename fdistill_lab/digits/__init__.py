"""Lab of notebook 04: f-distill at image scale on scikit-learn's 8x8 digits with the image trainer of ``train``:
the data (``data``), a small EDM teacher trained here (``teacher``), classifier-feature metrics (``metrics``)."""
