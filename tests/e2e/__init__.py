"""End-to-end tests: real Envoy + llmlb daemon + fake backends on 127.0.0.1."""
