"""Offline stand-ins for an Argo cluster, used by tests/hera: the v4.1.2 schemas in strict mode
(`schema`), the reference checks the schemas lack (`semantics`), and a small executor that runs
rendered templates' pods as local processes the way the controller would (`simulator`)."""
