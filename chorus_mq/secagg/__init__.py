"""Secure aggregation (SecAgg+-style): the aggregator learns the sum of the clients' inputs, nothing else.

Modules, one concept each, pure (no Redis, no store):

- ``encoding``  fixed-point encoding of float vectors modulo 2^64
- ``shamir``    Shamir secret sharing over the prime field GF(2^521 - 1)
- ``keys``      X25519 key pairs, key agreement + HKDF, domain-separated contexts
- ``prg``       the mask generator: a ChaCha20 keystream read as uint64 words
- ``sealing``   AEAD (ChaCha20-Poly1305) of the shares one client sends another
- ``graph``     the SecAgg+ neighbour graph (each client masks with K others)
- ``params``    a round's public parameters (cohort, K, T, encoding)
- ``messages``  what travels in each phase
- ``client``    the client's state machine
- ``server``    the aggregator's state machine

See the README section "Secure aggregation" for who must be trusted for what.
"""
