#!/usr/bin/env bash
# Record the energy and CO2e of any training script in the lab's carbon-audit ledger, then summarise.
# Run: bash examples/audit_a_script.sh
# A lab server instead of a local file: SSPROP_ENERGY_LEDGER=postgresql://user@host:5432/dbname
set -euo pipefail
export SSPROP_ENERGY_LEDGER="${SSPROP_ENERGY_LEDGER:-$(mktemp -d)/ledger.sqlite}"
ssprop-energy audit run --project demo --tag example -- python -c "sum(i * i for i in range(10**7))"
ssprop-energy audit list
ssprop-energy audit summary --by project,user
