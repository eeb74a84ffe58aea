/* SPDX-License-Identifier: MIT */
#ifndef TC_MATCH_H
#define TC_MATCH_H

/* Return the version of the match core's ABI, bumped when the layout changes. */
int tc_abi_version(void);

#endif
