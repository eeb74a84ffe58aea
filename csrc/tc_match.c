/* SPDX-License-Identifier: MIT */
#include "tc_match.h"

int tc_abi_version(void) { return 1; }
