/** The dependency fields of an AssignmentsMessage, empty: for tests that send tasks only. */
export const NO_DEPS = { secrets: [], removeSecrets: [], configs: [], removeConfigs: [], networks: [], removeNetworks: [], networkViews: [] };
