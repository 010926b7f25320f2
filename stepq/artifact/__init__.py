"""The compiled artefact: ``QuantizedModel``, its per-layer report, save / load (safetensors +
JSON, never pickle) and the graph's JSON serialisation."""
