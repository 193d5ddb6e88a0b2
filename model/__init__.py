"""Layers of the geo-localization network: backbones, aggregations, CCT, functional ops, weight tables."""
