"""External peers the suite measures beside the plugin: servers users pick instead (issue 18)."""
