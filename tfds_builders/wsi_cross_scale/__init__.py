"""``wsi_cross_scale``: groups of same-centre views at several magnifications cut from whole-slide images."""
