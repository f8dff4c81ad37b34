"""Optional integrations with other frameworks, imported only on request (nothing here is imported by ``vittt``)."""
