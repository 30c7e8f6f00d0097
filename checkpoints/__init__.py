"""Checkpoint I/O. The modules import each other at module level only, in layers (none imports a layer above it;
tests/test_checkpoint_loader.py checks the graph):

    errors, layout, fp4_format                  no other checkpoints module
    config_inference, manifest, orbax_store     errors, layout; orbax_store is the only module that calls orbax
    demo_tokenizer                              errors
    quantized_io                                orbax_store, manifest, config_inference (reads `pi05 quantize` output)
    openpi_io                                   orbax_store, manifest, quantized_io: the public entry, `load_params`
                                                and `read_config` for any checkpoint, plain or quantized
    quantize, random_init                       openpi_io (+ orbax_store, manifest / demo_tokenizer): the writers
"""
