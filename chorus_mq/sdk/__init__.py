"""The Python SDK by role: ``operator.OperatorSdk`` (federations, clients, rounds), ``participant.ParticipantSdk``
(a client's uploads and pulls), both on ``reader.Reader`` (status, rounds, events) over one
``connection.Connection``; ``combined.Sdk`` is both roles. :class:`chorus_mq.client.ChorusClient` adds the
training entry points. Nothing is imported here: a submodule's importers load only what they use.
"""
