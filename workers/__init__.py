"""Pool workers."""
