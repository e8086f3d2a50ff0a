module sandbox-operator/tools/pause

go 1.23
