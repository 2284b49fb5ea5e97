/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * NBD protocol constants, from NetworkBlockDevice/nbd doc/proto.md.
 * Everything on the wire is big-endian; the sizes below are wire sizes.
 */
#ifndef IMGFS_NBD_PROTO_H
#define IMGFS_NBD_PROTO_H

#include <stdint.h>

/* Handshake ("Newstyle negotiation") */
#define NBD_MAGIC                0x4e42444d41474943ULL /* "NBDMAGIC" */
#define NBD_IHAVEOPT             0x49484156454f5054ULL /* "IHAVEOPT" */
#define NBD_REP_MAGIC            0x0003e889045565a9ULL

/* handshake flags (server) */
#define NBD_FLAG_FIXED_NEWSTYLE  (1u << 0)
#define NBD_FLAG_NO_ZEROES       (1u << 1)
/* client flags */
#define NBD_FLAG_C_FIXED_NEWSTYLE (1u << 0)
#define NBD_FLAG_C_NO_ZEROES     (1u << 1)

/* options */
#define NBD_OPT_EXPORT_NAME      1
#define NBD_OPT_ABORT            2
#define NBD_OPT_LIST             3
#define NBD_OPT_PEEK_EXPORT      4
#define NBD_OPT_STARTTLS         5
#define NBD_OPT_INFO             6
#define NBD_OPT_GO               7
#define NBD_OPT_STRUCTURED_REPLY 8
#define NBD_OPT_LIST_META_CONTEXT 9
#define NBD_OPT_SET_META_CONTEXT 10
#define NBD_OPT_EXTENDED_HEADERS 11

/* option reply types */
#define NBD_REP_ACK              1
#define NBD_REP_SERVER           2
#define NBD_REP_INFO             3
#define NBD_REP_META_CONTEXT     4
#define NBD_REP_FLAG_ERROR       (1u << 31)
#define NBD_REP_ERR_UNSUP        (NBD_REP_FLAG_ERROR | 1)
#define NBD_REP_ERR_POLICY       (NBD_REP_FLAG_ERROR | 2)
#define NBD_REP_ERR_INVALID      (NBD_REP_FLAG_ERROR | 3)
#define NBD_REP_ERR_PLATFORM     (NBD_REP_FLAG_ERROR | 4)
#define NBD_REP_ERR_TLS_REQD     (NBD_REP_FLAG_ERROR | 5)
#define NBD_REP_ERR_UNKNOWN      (NBD_REP_FLAG_ERROR | 6)
#define NBD_REP_ERR_SHUTDOWN     (NBD_REP_FLAG_ERROR | 7)
#define NBD_REP_ERR_BLOCK_SIZE_REQD (NBD_REP_FLAG_ERROR | 8)
#define NBD_REP_ERR_TOO_BIG      (NBD_REP_FLAG_ERROR | 9)

/* NBD_REP_INFO types */
#define NBD_INFO_EXPORT          0
#define NBD_INFO_NAME            1
#define NBD_INFO_DESCRIPTION     2
#define NBD_INFO_BLOCK_SIZE      3

/* transmission flags */
#define NBD_FLAG_HAS_FLAGS       (1u << 0)
#define NBD_FLAG_READ_ONLY       (1u << 1)
#define NBD_FLAG_SEND_FLUSH      (1u << 2)
#define NBD_FLAG_SEND_FUA        (1u << 3)
#define NBD_FLAG_ROTATIONAL      (1u << 4)
#define NBD_FLAG_SEND_TRIM       (1u << 5)
#define NBD_FLAG_SEND_WRITE_ZEROES (1u << 6)
#define NBD_FLAG_SEND_DF         (1u << 7)
#define NBD_FLAG_CAN_MULTI_CONN  (1u << 8)
#define NBD_FLAG_SEND_RESIZE     (1u << 9)
#define NBD_FLAG_SEND_CACHE      (1u << 10)
#define NBD_FLAG_SEND_FAST_ZERO  (1u << 11)

/* Transmission: requests (28 bytes) */
#define NBD_REQUEST_MAGIC        0x25609513u
#define NBD_REQUEST_SIZE         28

/* command flags */
#define NBD_CMD_FLAG_FUA         (1u << 0)
#define NBD_CMD_FLAG_NO_HOLE     (1u << 1)
#define NBD_CMD_FLAG_DF          (1u << 2)
#define NBD_CMD_FLAG_REQ_ONE     (1u << 3)
#define NBD_CMD_FLAG_FAST_ZERO   (1u << 4)

/* commands */
#define NBD_CMD_READ             0
#define NBD_CMD_WRITE            1
#define NBD_CMD_DISC             2
#define NBD_CMD_FLUSH            3
#define NBD_CMD_TRIM             4
#define NBD_CMD_CACHE            5
#define NBD_CMD_WRITE_ZEROES     6
#define NBD_CMD_BLOCK_STATUS     7

/* simple reply (16 bytes) */
#define NBD_SIMPLE_REPLY_MAGIC   0x67446698u
#define NBD_SIMPLE_REPLY_SIZE    16

/* structured reply chunk header (20 bytes) */
#define NBD_STRUCTURED_REPLY_MAGIC 0x668e33efu
#define NBD_STRUCTURED_REPLY_SIZE 20
#define NBD_REPLY_FLAG_DONE      (1u << 0)
#define NBD_REPLY_TYPE_NONE      0
#define NBD_REPLY_TYPE_OFFSET_DATA 1
#define NBD_REPLY_TYPE_OFFSET_HOLE 2
#define NBD_REPLY_TYPE_BLOCK_STATUS 5
#define NBD_REPLY_TYPE_ERROR     ((1u << 15) + 1)
#define NBD_REPLY_TYPE_ERROR_OFFSET ((1u << 15) + 2)

/* base:allocation extent flags */
#define NBD_STATE_HOLE           (1u << 0)
#define NBD_STATE_ZERO           (1u << 1)

/* error values */
#define NBD_EPERM                1
#define NBD_EIO                  5
#define NBD_ENOMEM               12
#define NBD_EINVAL               22
#define NBD_ENOSPC               28
#define NBD_EOVERFLOW            75
#define NBD_ENOTSUP              95
#define NBD_ESHUTDOWN            108

/* Limits this server applies (see doc/proto.md "Size constraints"). */
#define NBD_MAX_STRING           4096        /* names, descriptions, queries */
#define NBD_MAX_PAYLOAD          (32u << 20) /* largest READ/WRITE we accept */
#define NBD_MIN_BLOCK            1
#define NBD_PREF_BLOCK           4096
#define NBD_MAX_OPTION_LEN       (64u << 10) /* larger option payload: disconnect */
#define NBD_MAX_OPTIONS          256         /* options per handshake */
#define NBD_MAX_EXTENTS          (16u << 10) /* extents in one block-status chunk */
#define NBD_DEFAULT_PORT         10809
#define NBD_DEFAULT_PORT_STR     "10809"

#define NBD_CONTEXT_BASE_ALLOCATION "base:allocation"
#define NBD_CONTEXT_ALLOCATION_DEPTH "qemu:allocation-depth"

#endif
