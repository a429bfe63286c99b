// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

// Test doubles of Polymarket's exchanges: they only emit `OrderFilled` with the exact signatures of
// the real contracts (feeds.md, "Polygon chain"), so the polygon source reads real ABI-encoded logs
// from a real EVM node. The tests check the compiled topics against the published ones.

struct FillV2 {
    bytes32 orderHash;
    address maker;
    address taker;
    uint8 side;
    uint256 tokenId;
    uint256 makerAmountFilled;
    uint256 takerAmountFilled;
    uint256 fee;
}

contract ExchangeV2 {
    event OrderFilled(
        bytes32 indexed orderHash,
        address indexed maker,
        address indexed taker,
        uint8 side,
        uint256 tokenId,
        uint256 makerAmountFilled,
        uint256 takerAmountFilled,
        uint256 fee,
        bytes32 builder,
        bytes32 metadata
    );

    // Several fills in one transaction, as one match of a taker against several makers gives.
    function fill(FillV2[] calldata fills) external {
        for (uint256 i = 0; i < fills.length; i++) {
            FillV2 calldata f = fills[i];
            emit OrderFilled(
                f.orderHash, f.maker, f.taker, f.side, f.tokenId,
                f.makerAmountFilled, f.takerAmountFilled, f.fee, bytes32(0), bytes32(0)
            );
        }
    }
}

contract ExchangeV1 {
    event OrderFilled(
        bytes32 indexed orderHash,
        address indexed maker,
        address indexed taker,
        uint256 makerAssetId,
        uint256 takerAssetId,
        uint256 makerAmountFilled,
        uint256 takerAmountFilled,
        uint256 fee
    );

    function fill(
        bytes32 orderHash,
        address maker,
        address taker,
        uint256 makerAssetId,
        uint256 takerAssetId,
        uint256 makerAmountFilled,
        uint256 takerAmountFilled
    ) external {
        emit OrderFilled(
            orderHash, maker, taker, makerAssetId, takerAssetId, makerAmountFilled, takerAmountFilled, 0
        );
    }
}
